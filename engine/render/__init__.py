"""Renderers behind one interface: neural (LivePortrait warp + decode) and classic (warp-only), plus paste-back."""
