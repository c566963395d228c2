import sys

from services.gateway.app import main

sys.exit(main(sys.argv[1:]))
