"""Quantized weight formats."""
