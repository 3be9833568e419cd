"""Config schemas: the settings every entry point accepts, checked when the config is composed,
before any heavy import. Imports nothing above sem_cls.errors."""
