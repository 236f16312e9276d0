"""Positional-bias curves: fit, save, load, apply. Pure math over scores and positions (no model code)."""

from __future__ import annotations

from calibration.curve import CURVE_FORMAT_VERSION, BiasCurve, CurveMismatchError, fit_curve

__all__ = ["CURVE_FORMAT_VERSION", "BiasCurve", "CurveMismatchError", "fit_curve"]
