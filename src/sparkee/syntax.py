"""The syntax of the strings users write (policies, acceptance rules), in one place: the parsers'
error messages and the CLI's help read these. Pure Python, so the CLI starts without torch."""

POLICY_SYNTAX = (
    "full, fixed:L, confidence:L:H (H: entropy in nats), spar-k:P:L with P = even, odd, triple or "
    "any pattern of F and E, or spar-k:adaptive:L with an optional :K (the longest run of early "
    "steps, default 8)"
)
ACCEPT_SYNTAX = (
    "exact, topk:K, typical:EPS[:DELTA], unit-distance:D, or no-stretch:RULE (RULE, but never keep "
    "a repeated speech unit where the full model switches unit)"
)
