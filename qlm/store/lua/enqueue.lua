-- enqueue: create a request record and queue it in its group, idempotently by id.
--
-- KEYS[1]  req:{id}        the request record (hash)
-- KEYS[2]  group:{group}   the group's sorted set of queued ids
-- KEYS[3]  groups          the group index
-- ARGV[1]  id              the request id
-- ARGV[2]  group           group key text "model|slo_class|window"
-- ARGV[3]  deadline_at     score of the request in its group
-- ARGV[4]  k               number of identity field/value pairs that follow
-- ARGV[5 .. 4+2k]          identity pairs: a retry must carry exactly these values
-- ARGV[5+2k ..]            the other record field/value pairs (state, timestamps, ...)
--
-- Returns {'created'}; {'exists', field1, value1, ...} (the stored record) when the
-- id exists with the same identity; {'conflict', field, stored_value} when it
-- exists with a different one. Nothing is written unless 'created'.

local k = tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 1 then
  for i = 0, k - 1 do
    local field = ARGV[5 + 2 * i]
    local stored = redis.call('HGET', KEYS[1], field)
    if stored ~= ARGV[6 + 2 * i] then
      return {'conflict', field, stored or ''}
    end
  end
  local record = redis.call('HGETALL', KEYS[1])
  table.insert(record, 1, 'exists')
  return record
end

local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
for i = 1, #fields, 100 do
  redis.call('HSET', KEYS[1], unpack(fields, i, math.min(i + 99, #fields)))
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[3], 'LT', ARGV[3], ARGV[2])
return {'created'}
