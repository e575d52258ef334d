"""``python -m connector_credentials_demo`` (what ``make demo`` runs)."""

import sys

from connector_credentials_demo.demo import main

sys.exit(main())
