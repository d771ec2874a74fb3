"""What the ``probe``, ``demo`` and ``netcheck`` commands do; only the command line imports these."""
