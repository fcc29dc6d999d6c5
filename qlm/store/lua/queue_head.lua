-- queue_head: read (without taking) what `pull` with the same arguments would take,
-- with the scheduling fields of each request, so a worker can plan its pull.
--
-- KEYS[1]  vq:{worker}        the worker's virtual queue (list of group keys, head first)
-- ARGV[1]  prefix             key prefix (groups, group:{group}, req:{id} derived)
-- ARGV[2]  model              the worker's active model
-- ARGV[3]  max_requests       N > 0: at most N requests in all
-- ARGV[4 ..]                  the record fields to return per request
--
-- Walks the virtual queue exactly as pull.lua does (empty groups skipped, stops at the
-- first queued group of another model). Returns one JSON text [[group, [[value, ...],
-- ...]], ...]: per group in queue order, its first requests in pull order, each as
-- the values of the fields asked for (false when missing). Read-only.

local prefix, model = ARGV[1], ARGV[2]
local remaining = tonumber(ARGV[3])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
local out = {}
local order = redis.call('LRANGE', KEYS[1], 0, -1)
local queued = nonempty_groups(prefix, order)
for i, group in ipairs(order) do
  if remaining <= 0 then break end
  if queued[i] and model_of(group) ~= model then break end
  if queued[i] then
    local rows = {}
    for _, id in ipairs(redis.call('ZRANGE', group_key(prefix, group), 0, remaining - 1)) do
      rows[#rows + 1] = redis.call('HMGET', req_key(prefix, id), unpack(fields))
    end
    remaining = remaining - #rows
    out[#out + 1] = {group, rows}
  end
end
return cjson.encode(out)
