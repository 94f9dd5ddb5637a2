"""Built-in roles. Each module only registers hooks; keep this package import-free."""
