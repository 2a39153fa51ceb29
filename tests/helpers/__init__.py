"""Helpers the tests share: the training app run as a subprocess (``app``), the model classes and callbacks that
app loads by dotted path (``probes``), and stock timm / Hugging Face reference encoders (``vit``).

Test modules import from here, never from each other, so that each test module can change on its own.
"""
