"""``python -m ddlab.metrics.classifier train|eval ...``."""

from .training import main

if __name__ == "__main__":
    main()
