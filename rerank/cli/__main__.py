"""``python -m rerank.cli`` = ``attn-rerank``."""

from __future__ import annotations

import sys

from rerank.cli import main

sys.exit(main())
