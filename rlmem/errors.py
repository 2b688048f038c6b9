"""Errors a user can cause. The CLI turns each into one message and exit status 2."""


class ConfigError(ValueError):
    """A configuration, command-line or file error: the message names the key and the valid choices."""


# The TensorBoard text tag under which a population's member records that it diverged: the train loop
# writes it, and ``rlmem summary``/``rlmem plot`` read it to count the member as diverged.
DIVERGED_TAG = "diverged"


class TrainingDiverged(RuntimeError):
    """A loss, gradient, parameter or carried memory state stopped being finite.

    ``quantity`` names what (``"losses/value_loss"``, ``"gradient of core.weight"``, ``"memory state
    sensitivities/w"``); the training loop adds the step and the last good checkpoint, and the CLI
    turns it into one message and exit status 2.
    """

    def __init__(self, quantity: str) -> None:
        super().__init__(f"non-finite {quantity}")
        self.quantity = quantity
