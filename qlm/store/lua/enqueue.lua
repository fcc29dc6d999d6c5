-- enqueue: create a request record and queue it in its group, idempotently by id.
--
-- KEYS[1]  req:{id}        the request record (hash)
-- KEYS[2]  group:{group}   the group's sorted set of queued ids
-- KEYS[3]  groups          the group index
-- KEYS[4]  queue:log       the queue log (one '+' entry when created)
-- ARGV[1]  id              the request id
-- ARGV[2]  group           group key text (str(GroupKey): "model|slo_class|window[|tenant]")
-- ARGV[3]  deadline_at     score of the request in its group
-- ARGV[4]  identity        JSON array of [field, value] pairs (strings) that a retry
--                           must repeat exactly, compared in this order
-- ARGV[5]  fields          JSON array of the other [field, value] pairs of the record
--
-- Returns {'created'}; {'exists', record_json} (the stored record as a JSON object
-- of strings) when the id exists with the same identity; {'conflict', field,
-- stored_value} when it exists with a different one. Nothing is written unless
-- 'created'.

local identity = cjson.decode(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, pair in ipairs(identity) do
    local stored = redis.call('HGET', KEYS[1], pair[1])
    if stored ~= pair[2] then
      return {'conflict', pair[1], stored or ''}
    end
  end
  return {'exists', record_json(KEYS[1])}
end

local flat = {}
for _, pair in ipairs(identity) do flat[#flat + 1] = pair[1]; flat[#flat + 1] = pair[2] end
for _, pair in ipairs(cjson.decode(ARGV[5])) do
  flat[#flat + 1] = pair[1]; flat[#flat + 1] = pair[2]
end
for i = 1, #flat, 100 do
  redis.call('HSET', KEYS[1], unpack(flat, i, math.min(i + 99, #flat)))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], 'LT', ARGV[3], ARGV[2])
log_change(KEYS[4], '+', ARGV[2], ARGV[1])
return {'created'}
