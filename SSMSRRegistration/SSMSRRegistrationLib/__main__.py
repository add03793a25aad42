"""``python -m SSMSRRegistrationLib`` runs the ``ssmsr`` command."""

import sys

from .interfaces.cli import main

sys.exit(main())
