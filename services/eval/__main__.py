import sys

from services.eval.app import main

sys.exit(main(sys.argv[1:]))
