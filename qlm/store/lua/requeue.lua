-- requeue (eviction): a worker returns a request it holds to its group, keeping progress.
-- A request whose cancellation was requested is cancelled instead.
--
-- KEYS[1]  req:{id}           the request record
-- ARGV[1]  prefix             key prefix (running:{worker}, leases, group:{group},
--                             groups, queue:log, stream:{id} derived)
-- ARGV[2]  id                 request id
-- ARGV[3]  worker             the worker that must hold the request
-- ARGV[4]  num_generated      progress to keep, or '' to keep the stored value
-- ARGV[5]  now                time of the eviction (finished_at when cancelled)
-- ARGV[6]  record_ttl_s       as in finish.lua (used when cancelled)
-- ARGV[7]  stream_ttl_s       as in finish.lua (used when cancelled)
-- ARGV[8]  stream_maxlen      as in finish.lua (used when cancelled)
--
-- Returns {'queued'} or {'cancelled'}; {'not_found'}; {'lost', state, worker} when the
-- request is not running on this worker; {'invalid', field, problem}. Nothing is
-- written unless 'queued' or 'cancelled'.

local prefix, id, worker = ARGV[1], ARGV[2], ARGV[3]
local rec = redis.call('HMGET', KEYS[1], 'state', 'worker', 'max_tokens', 'group', 'deadline_at',
  'cancel_requested')
if not rec[1] then return {'not_found'} end
if rec[1] ~= 'running' or rec[2] ~= worker then return {'lost', rec[1], rec[2] or ''} end
if ARGV[4] ~= '' then
  if tonumber(ARGV[4]) > tonumber(rec[3]) then
    return {'invalid', 'num_generated', 'must be <= max_tokens=' .. rec[3] .. ', got ' .. ARGV[4]}
  end
  redis.call('HSET', KEYS[1], 'num_generated', ARGV[4])
end
release_lease(prefix, id, worker)
if rec[6] == '1' then
  finish_record(prefix, id, 'cancelled', 'cancelled by request',
    {now = ARGV[5], record_ttl_s = ARGV[6], stream_ttl_s = ARGV[7], stream_maxlen = ARGV[8]})
  return {'cancelled'}
end
requeue_record(prefix, id, rec[4], rec[5])
return {'queued'}
