"""`python -m hf_alphaedit`: the `hf-alphaedit` command line."""

import sys

from .cli import main

sys.exit(main())
