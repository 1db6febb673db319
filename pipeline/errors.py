"""The one exception root of the pipeline package."""


class PipelineError(Exception):
    """Base of every error raised by the pipeline package."""


class TopicError(PipelineError, ValueError):
    """A topic, topic filter or topic template is not valid."""
