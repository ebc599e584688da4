"""Named benchmark settings and user tasks: data, model, training recipe, output function, sizes."""

from tdatune.settings.registry import SETTINGS, Setting, get_setting, user_setting

__all__ = ["SETTINGS", "Setting", "get_setting", "user_setting"]
