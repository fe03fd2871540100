"""``python app -i INPUT -o OUTPUT [-m BUNDLE]``: run the microcalcification classification application."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
