"""Jobs, schedules, sensors, the ``Definitions`` object and the ``forgeline`` CLI."""
