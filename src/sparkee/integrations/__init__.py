"""Optional integrations with other engines. Core sparkee never imports this package."""
