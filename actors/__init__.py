"""The compute plane: engines that turn Requests into Results, hosted in Ray actors."""
