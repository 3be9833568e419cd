"""sem-cls's config schemas in Hydra's ConfigStore. Hydra imports every module under
hydra_plugins/ when it starts, as its own plugins register their configs, so the schemas are
there however a config is composed: an entry point, the compose API, a test."""

from sem_cls.config.schema import register_schemas

register_schemas()
