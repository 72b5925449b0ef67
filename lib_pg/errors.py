class PGError(Exception):
    """A problem the user must fix before personalization guidance can run.

    The message is shown as is in the UI, the console and the API response,
    so it names the field or the cause and says what to do.
    """

    def __init__(self, message: str):
        super().__init__(f"Personalization Guidance: {message}")
        self.reason = message
