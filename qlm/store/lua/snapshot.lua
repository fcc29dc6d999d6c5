-- snapshot: read, atomically, which requests are queued in which group, what each
-- worker runs and every virtual queue. Read-only; records are read afterwards.
--
-- KEYS[1]  groups             the group index
-- KEYS[2]  workers            set of known workers
-- ARGV[1]  prefix             key prefix (group:{group}, vq:{worker}, running:{worker} derived)
--
-- Returns one JSON text {groups, workers}: groups = [[group, [id, ...]], ...] in
-- index order (earliest deadline first), ids by score; workers = [[worker, [vq
-- group, ...], [running id, ...]], ...]. An empty list may be encoded as {} (cjson).

local prefix = ARGV[1]
local groups = {}
for _, group in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  groups[#groups + 1] = {group, redis.call('ZRANGE', group_key(prefix, group), 0, -1)}
end
local workers = {}
for _, worker in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  workers[#workers + 1] = {worker, redis.call('LRANGE', prefix .. 'vq:' .. worker, 0, -1),
    redis.call('SMEMBERS', running_key(prefix, worker))}
end
return cjson.encode({groups, workers})
