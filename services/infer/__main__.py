import sys

from services.infer.app import main

sys.exit(main(sys.argv[1:]))
