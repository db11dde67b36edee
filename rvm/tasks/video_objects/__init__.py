"""Following one object through a video from its first-frame mask (`task`): the systems of
`rvm.models.video_objects` trained and measured through the one loop."""
