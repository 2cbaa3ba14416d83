"""The Engine interface, its cleartext and cost interpretations, and what is written once against it.

Nonlinear functions, their approximations, the guard, and the plan-op handlers.
"""
