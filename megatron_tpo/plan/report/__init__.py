"""The planner's answers as text and as data, and a chosen plan written as configs."""
