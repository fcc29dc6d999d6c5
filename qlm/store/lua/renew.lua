-- renew: a worker's heartbeat extends the leases of the requests it still holds and
-- learns which it lost and which it was asked to cancel.
--
-- KEYS[1]  leases             lease sorted set (score = lease_expires_at)
-- ARGV[1]  prefix             key prefix (req:{id} derived)
-- ARGV[2]  worker             worker id
-- ARGV[3]  lease_expires_at   the new expiry
-- ARGV[4 ..]                  ids the worker believes it is running
--
-- Returns {lost_ids, cancel_requested_ids}. Lost ids (not running on this worker any
-- more) are left untouched; the others get the new lease.

local prefix, worker, lease = ARGV[1], ARGV[2], ARGV[3]
local lost, cancelled = {}, {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local rk = req_key(prefix, id)
  local rec = redis.call('HMGET', rk, 'state', 'worker', 'cancel_requested')
  if rec[1] ~= 'running' or rec[2] ~= worker then
    lost[#lost + 1] = id
  else
    redis.call('ZADD', KEYS[1], 'XX', lease, id)
    redis.call('HSET', rk, 'lease_expires_at', lease)
    if rec[3] == '1' then cancelled[#cancelled + 1] = id end
  end
end
return {lost, cancelled}
