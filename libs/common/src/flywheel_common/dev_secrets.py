"""Development secrets: public, in the source, used only in development mode (FLYWHEEL_MODE)."""

# Signs Feedback events (feedback) and verifies them (trainer) when no key file is configured.
DEV_EVENT_SIGNING_KEY = b"flywheel-dev-event-signing-key"
