"""The KoboldAI API (/api/v1, /api/extra) that SillyTavern's KoboldAI mode and Kobold Lite use."""
