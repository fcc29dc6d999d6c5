-- set_forecasts: replace every group's forecast (the scheduler, after each decision).
--
-- KEYS[1]  forecast   hash: group key → the group's forecast (JSON)
-- ARGV[1 ..]  group key, forecast JSON, group key, forecast JSON, ... (none: no forecast)
--
-- One field per group, however many requests are queued.
-- Returns the number of groups written.

redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return #ARGV / 2
