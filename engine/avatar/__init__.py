"""Avatar preparation (validation, face crop, features), the on-disk store, the default avatar, paste-back."""
