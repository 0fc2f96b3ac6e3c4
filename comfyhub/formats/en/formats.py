# Times to the second wherever Django formats a datetime by itself (the admin's lists, read-only fields and
# inlines): an operator lines a task's events up with log lines, and "11:31 a.m." hides their order.
DATETIME_FORMAT = "Y-m-d H:i:s"
SHORT_DATETIME_FORMAT = "Y-m-d H:i:s"
