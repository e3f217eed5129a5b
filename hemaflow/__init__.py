"""hemaflow: reproducible training and shipping of white-blood-cell classifiers."""

__version__ = "0.1.0"
