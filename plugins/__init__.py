"""plait's builtin plugins, one folder per method; each is listed in ``plait.manager.DEFAULT_PLUGINS``."""
