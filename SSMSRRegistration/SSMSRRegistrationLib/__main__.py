"""``python -m SSMSRRegistrationLib`` runs the ``ssmsr`` command."""

import sys

from .cli import main

sys.exit(main())
