"""`python -m keras_mmtl` runs the keras-mmtl command."""

import sys

from keras_mmtl.cli import main

sys.exit(main())
