"""ban_analysis: Born-Again Networks with gradient instrumentation and seed statistics.

Importing the package has no side effects: no logging configuration, no device probing,
no data access. See README.md for the command-line entry point ``ban-analysis``.
"""

__version__ = "0.1.0"
