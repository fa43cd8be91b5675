"""flashlib: a reference reproduction of *LLM in a flash* (Alizadeh et al., Apple, 2023)."""

__version__ = "0.1.0"
