import sys

from mg_editing.cli import main

sys.exit(main())
