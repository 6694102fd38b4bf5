"""Converters between tformer and other toolkits (Hugging Face Marian, CTranslate2)."""
