import sys

from services.tokenize.app import main

sys.exit(main(sys.argv[1:]))
