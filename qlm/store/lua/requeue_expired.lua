-- requeue_expired: return requests whose lease expired before `now` to their groups
-- (progress kept); those whose cancellation was requested are cancelled instead.
--
-- KEYS[1]  leases             lease sorted set (score = lease_expires_at)
-- ARGV[1]  prefix             key prefix (req:{id}, running:{worker}, group:{group},
--                             groups, queue:log, stream:{id} derived)
-- ARGV[2]  now                leases with lease_expires_at < now have expired
-- ARGV[3]  limit              at most this many per call (the caller loops)
-- ARGV[4]  record_ttl_s       as in finish.lua (used when cancelled)
-- ARGV[5]  stream_ttl_s       as in finish.lua (used when cancelled)
-- ARGV[6]  stream_maxlen      as in finish.lua (used when cancelled)
--
-- Returns a flat array {id1, outcome1, id2, outcome2, ...}, outcome 'queued',
-- 'cancelled' or 'missing' (lease of a record that no longer exists: dropped).

local prefix, now = ARGV[1], ARGV[2]
local opts = {now = now, record_ttl_s = ARGV[4], stream_ttl_s = ARGV[5], stream_maxlen = ARGV[6]}
local out = {}
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, ARGV[3])
for _, id in ipairs(expired) do
  local rec = redis.call('HMGET', req_key(prefix, id), 'state', 'worker', 'group', 'deadline_at',
    'cancel_requested')
  release_lease(prefix, id, rec[2])
  local outcome
  if not rec[1] then
    outcome = 'missing'
  elseif rec[5] == '1' then
    finish_record(prefix, id, 'cancelled', 'cancelled by request', opts)
    outcome = 'cancelled'
  else
    requeue_record(prefix, id, rec[3], rec[4])
    outcome = 'queued'
  end
  out[#out + 1] = id
  out[#out + 1] = outcome
end
return out
