"""``python -m gateway`` is ``iotgw``."""

import sys

from gateway.cli.main import main

sys.exit(main())
