import sys

from gateway.weights.download import main

sys.exit(main())
