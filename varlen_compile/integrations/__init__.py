"""Integrations with other libraries, each an optional import (``varlen_compile.integrations.<name>``)."""
