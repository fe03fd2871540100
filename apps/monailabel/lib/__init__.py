"""The MONAI Label app's building blocks beside ``main.py`` (MONAI Label puts the app folder on the path)."""
