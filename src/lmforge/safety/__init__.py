"""Safety stage: prompt-injection / jailbreak guard (normalise, heuristics, classifier, policy),
red-team harness, streaming PII redaction; DP-SGD, unlearning, interpretability and the model card."""
