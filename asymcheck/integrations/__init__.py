"""Integrations of AsymCheck with training frameworks, one module per framework.

Each module imports its framework when it is imported itself (an optional extra), so
``import asymcheck`` never needs one.
"""
