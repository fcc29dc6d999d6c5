-- cancel / reject: end a queued request now; for a running one, either flag it so the
-- worker stops it (cancel) or refuse (reject applies to queued requests only).
--
-- KEYS[1]  req:{id}           the request record
-- ARGV[1]  prefix             key prefix (group:{group}, groups, queue:log, stream:{id}
--                             derived)
-- ARGV[2]  id                 request id
-- ARGV[3]  mode               'cancel' (final state cancelled) or 'reject' (failed)
-- ARGV[4]  reason             error text stored on the record
-- ARGV[5]  now                finished_at
-- ARGV[6]  record_ttl_s       as in finish.lua
-- ARGV[7]  stream_ttl_s       as in finish.lua
-- ARGV[8]  stream_maxlen      as in finish.lua
--
-- Returns {'not_found'}; {'done', final_state} when a queued request ended;
-- {'requested', 'running'} when a running request was flagged (cancel only);
-- {'unchanged', state} when nothing was written (already terminal, or reject of a
-- running request).

local prefix, id, mode = ARGV[1], ARGV[2], ARGV[3]
local rec = redis.call('HMGET', KEYS[1], 'state', 'group')
if not rec[1] then return {'not_found'} end
if rec[1] == 'queued' then
  remove_from_group(prefix, id, rec[2])
  local final_state = 'cancelled'
  if mode == 'reject' then final_state = 'failed' end
  finish_record(prefix, id, final_state, ARGV[4],
    {now = ARGV[5], record_ttl_s = ARGV[6], stream_ttl_s = ARGV[7], stream_maxlen = ARGV[8]})
  return {'done', final_state}
end
if rec[1] == 'running' and mode == 'cancel' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'error', ARGV[4])
  return {'requested', 'running'}
end
return {'unchanged', rec[1]}
